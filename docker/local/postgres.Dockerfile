# Offline stand-in for postgres:16-bookworm: Debian bookworm's PostgreSQL, which is major version 15.
# The entrypoint does the part of the official image's that docker-compose.yml relies on: POSTGRES_USER /
# POSTGRES_PASSWORD / POSTGRES_DB create the cluster's superuser and database on first start, in
# /var/lib/postgresql/data (the pgdata volume), with password (scram-sha-256) logins over the network.
ARG SKIN_DEBIAN_IMAGE=skin-local/debian:bookworm
FROM ${SKIN_DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql && chmod 700 /var/lib/postgresql/data
COPY docker/local/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
