# The upload page rendered from release/meta.json, served by nginx, which also passes the API paths to the gate.
# Base images are build arguments (SKIN_PIP_IMAGE, SKIN_NGINX_IMAGE): public by default, local offline.
ARG SKIN_PIP_IMAGE=python:3.11-slim-bookworm
ARG SKIN_NGINX_IMAGE=nginx:1.27-alpine
FROM ${SKIN_PIP_IMAGE} AS build
COPY requirements.txt /tmp/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir "$(grep -E '^Jinja2==' /tmp/requirements.txt)"
WORKDIR /src
# stack/page.py renders it: meta.json through skinmodel.release (standard library only), the defaults in stack/settings.py.
COPY site/ site/
COPY skinmodel/__init__.py skinmodel/dataset.py skinmodel/inputs.py skinmodel/labels.py skinmodel/release.py skinmodel/
COPY stack/__init__.py stack/page.py stack/settings.py stack/tokens.py stack/
COPY config.properties ./
COPY release/meta.json release/model_card.md release/
RUN /opt/venv/bin/python -m stack.page --meta release/meta.json --api-base "" --out /dist

FROM ${SKIN_NGINX_IMAGE}
COPY --from=build /dist /usr/share/nginx/html
COPY docker/nginx.conf /etc/nginx/conf.d/default.conf
COPY docker/nginx-listen.conf /etc/nginx/skin-listen.conf
# compose starts nginx with the TCP front instead (docker-compose.yml: command)
COPY docker/nginx-front.conf /etc/nginx/front/nginx.conf
COPY docker/nginx-listen-front.conf /etc/nginx/front/skin-listen.conf
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
