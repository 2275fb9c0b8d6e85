# offload in a container: the release binary on a slim Debian, data in /data.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/offload

FROM debian:bookworm-slim
# The time zone database, for schedules with a `timezone` (read from /usr/share/zoneinfo).
RUN apt-get update && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /data offload && mkdir -p /data && chown offload /data
COPY --from=build /src/target/release/offload /usr/local/bin/offload
USER offload
ENV OFFLOAD_BIND=0.0.0.0:8080 OFFLOAD_DATA_DIR=/data
EXPOSE 8080
VOLUME /data
ENTRYPOINT ["offload"]
CMD ["serve"]
