# Offline stand-in for nginx:1.27-alpine: Debian bookworm's nginx (1.22), laid out as the official image is
# (conf.d/*.conf included, html in /usr/share/nginx/html, logs to the container's output), plus wget for the
# health check (busybox has it in the alpine image) and the stream module (compiled into the official image).
ARG SKIN_DEBIAN_IMAGE=skin-local/debian:bookworm
FROM ${SKIN_DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx libnginx-mod-stream wget \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
