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
# The core compiled by mypyc, as `./dev` builds it (infra/native.py): the C compiler is needed
# only while building, so it leaves in the same layer. The last step fails the build unless the
# interpreter loads the compiled core; mypy stays, since the build's key names its version. The
# install is editable, as ./dev's is: mypy compiles the sources from the project folder, where
# pyproject.toml holds its settings (from site-packages it takes every installed module for one
# of the project's).
ENV WALLET_CACHE_DIR=/opt/streamwallet-cache
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir -e ".[native]" \
    && wallet native build \
    && apt-get purge -y gcc libc6-dev \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "from infra import native; d = native.core_description(); print(d); assert d.startswith('compiled')" \
    && useradd --create-home --uid 10001 wallet \
    && mkdir -p /var/lib/streamwallet \
    && chown wallet:wallet /var/lib/streamwallet

# Processor state (RocksDB) lives in the run folder; compose mounts a volume here.
ENV WALLET_RUN_DIR=/var/lib/streamwallet
USER wallet
CMD ["wallet", "--help"]
