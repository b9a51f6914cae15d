# A local stand-in for the official `postgres` image (docker/docker-compose.yml's `postgres` service) for
# machines that reach Debian's archive but no image registry: Debian's PostgreSQL (15 on bookworm; the
# official tag is 17, and the service needs nothing newer), honouring POSTGRES_USER, POSTGRES_PASSWORD
# and POSTGRES_DB on the first start of an empty data folder, as the official image does, with
# `pg_isready` on PATH for the healthcheck. Built by docker/ci/images.sh; never pushed.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql gosu \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/lib/postgresql/*/bin/* /usr/local/bin/ \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PGDATA=/var/lib/postgresql/data
COPY ci/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
