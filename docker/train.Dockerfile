# kdprompt training image: `kdprompt teacher`, `kdprompt distill`, `accelerate launch` on one or many
# nodes (see docker/README.md). Build from the repository root:
#
#   docker build -f docker/train.Dockerfile -t kdprompt-train .
#
# torch 2.14.1's default PyPI wheels (x86_64) are CUDA 13.0 builds that ship their own CUDA runtime,
# cuBLAS, cuDNN and NCCL, so the base image only has to provide what the NVIDIA container toolkit reads
# (NVIDIA_* variables and the `cuda>=13.0` driver requirement): the small `base` flavour, not
# `cudnn-runtime`, whose cuDNN would be a second copy. Needs an NVIDIA driver >= 580 on the host.

# Ubuntu 24.04 ships Python 3.12; uv installs a standalone CPython 3.11 (the version a given uv release
# installs is fixed, so pinning uv pins Python).
FROM ghcr.io/astral-sh/uv:0.9.5 AS uv

FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# Another CUDA build of the same torch release, e.g. https://download.pytorch.org/whl/cu129 (with a
# matching nvidia/cuda:12.x base above for older drivers).
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv

# torch first: its own layer (about 4 GB) survives edits to kdprompt. Same pins as the Makefile.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/kdprompt
COPY pyproject.toml README.md ./
COPY kdprompt ./kdprompt
COPY recipes ./recipes
# A non-editable install cannot find the repository's recipes/ beside the package: point at the copy.
ENV KDPROMPT_RECIPES_DIR=/opt/kdprompt/recipes
# `kdprompt recipes` fails when it finds no recipes: a build-time check of the line above.
# `./[extras]` rather than `.[extras]`: the same for pip, and hadolint sees a path, not an unpinned name.
# The gpu extra brings faiss-gpu; faiss-cpu (a base dependency) ships the same `faiss` package, so it is
# removed and faiss-gpu reinstalled over it: class-vocabulary search then runs on the GPU with the model.
RUN pip install './[onnx,gpu]' \
    && pip uninstall -y faiss-cpu \
    && pip install --no-deps --force-reinstall faiss-gpu==1.15.1 \
    && kdprompt recipes > /dev/null

# Runs happen in /workspace: recipes write runs/ and cache/ relative to it and read data/coop by
# default, so mounting data/, runs/ and cache/ there needs no path overrides. Model downloads (Hugging
# Face, torch hub) and matplotlib's font cache go under cache/ so they persist with it, for any --user.
RUN groupadd --gid 10001 kdprompt \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 kdprompt \
    && install -d -o 10001 -g 10001 -m 1777 /workspace /workspace/runs /workspace/cache /workspace/data
ENV XDG_CACHE_HOME=/workspace/cache/xdg
WORKDIR /workspace
# Numeric, so that runtimes checking for a non-root user (e.g. runAsNonRoot) need not resolve a name.
USER 10001:10001

ENTRYPOINT ["kdprompt"]
CMD ["--help"]
