# A local stand-in for `prom/prometheus` (docker/docker-compose.yml's `prometheus` service) for machines
# that reach Debian's archive but no image registry: Debian's Prometheus (2.42 on bookworm), the same
# entrypoint, configuration path and storage folder as the official image. Built by
# docker/ci/images.sh; never pushed.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /etc/prometheus /prometheus \
    && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
