# syntax=docker/dockerfile:1
# CPU server: `bertexport serve` for artifacts mounted at /models (or copied in), torch-free.
# The wheel is built from this repository and installed with the `runtime,serve` extras
# only (ONNX Runtime, Starlette, uvicorn, prometheus-client; no torch, no transformers).
#
#   docker build -t bertexport-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/art:/models:ro" bertexport-serve
#   docker run --rm -p 8000:8000 -v "$PWD/embed:/models/embed:ro" -v "$PWD/ce:/models/ce:ro" \
#       -e BERTEXPORT_API_KEY=... bertexport-serve /models/embed /models/ce
#
# Copied in instead of mounted: a two-line Dockerfile `FROM bertexport-serve` +
# `COPY art /models`. Arguments after the image name replace the default `/models` (any
# `bertexport serve` option may follow the artifacts). The server exits 143 on SIGTERM once
# in-flight requests finish (--grace, 30 s by default: give `docker stop --time` as much).

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bertexport ./bertexport
COPY targets ./targets
COPY calib ./calib
RUN python -m pip install --no-cache-dir "build==1.*" \
 && python -m build --wheel --outdir /dist .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BERTEXPORT_CACHE=/tmp/bertexport-cache \
    HF_HUB_OFFLINE=1
COPY --from=wheel /dist /tmp/dist
COPY constraints.txt /tmp/constraints.txt
RUN python -m pip install -c /tmp/constraints.txt "$(ls /tmp/dist/bertexport-*.whl)[runtime,serve]" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && rm -rf /tmp/dist /tmp/constraints.txt \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin bertexport

USER 10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["bertexport", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models"]
