# The image of every Streamwallet service in docker-compose.yml; the service's command picks the role.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY infra ./infra
COPY wallet ./wallet
COPY schemas ./schemas
COPY streams ./streams
COPY producers ./producers
COPY consumers ./consumers
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 wallet \
    && mkdir -p /var/lib/streamwallet \
    && chown wallet:wallet /var/lib/streamwallet

# Processor state (RocksDB) lives in the run folder; compose mounts a volume here.
ENV WALLET_RUN_DIR=/var/lib/streamwallet
USER wallet
CMD ["wallet", "--help"]
