# kdprompt serving image: CPU only, serves one bundle from `kdprompt export` over HTTP (see
# docker/README.md). Build from the repository root:
#
#   docker build -f docker/serve.Dockerfile -t kdprompt-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/dtd-bundle:/bundle:ro" kdprompt-serve
#
# The bundle is mounted read-only at /bundle: one image serves any bundle. The default command can be
# replaced by another kdprompt command, e.g. `docker run ... kdprompt-serve predict /bundle /images`.
FROM python:3.11-slim-trixie

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# CPU wheels (version 2.14.1+cpu, which `==2.14.1` matches) are a fraction of the default CUDA ones.
# Same pins as the Makefile; the project install below keeps them (its requirements are satisfied).
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/kdprompt
COPY pyproject.toml README.md ./
COPY kdprompt ./kdprompt
# `./[extras]` rather than `.[extras]`: the same for pip, and hadolint sees a path, not an unpinned name.
RUN pip install './[serve,onnx]'

RUN groupadd --gid 10001 kdprompt && useradd --no-log-init --create-home --uid 10001 --gid 10001 kdprompt
WORKDIR /home/kdprompt
USER 10001:10001

EXPOSE 8000
# No curl in the slim image: python's urllib (raises, so exits non-zero, on an error status).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["kdprompt"]
CMD ["serve", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
