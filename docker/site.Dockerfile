# The upload page rendered from release/meta.json, served by nginx, which also proxies the inference paths.
FROM python:3.11-slim-bookworm AS build
RUN pip install --no-cache-dir Jinja2==3.1.6
WORKDIR /src
COPY site/ site/
COPY release/meta.json release/model_card.md release/
RUN python site/build.py --meta release/meta.json --api-base "" --out /dist

FROM nginx:1.27-alpine
COPY --from=build /dist /usr/share/nginx/html
COPY docker/nginx.conf /etc/nginx/conf.d/default.conf
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
