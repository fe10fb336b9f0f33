# syntax=docker/dockerfile:1
#
# One image for the subclone API and its Celery workers; docker-compose.yml
# gives each service its command.
#
#   API:         python -m app serve --api-only --host 0.0.0.0 --port 8000   (the default CMD)
#   GPU worker:  celery -A worker.celery_app worker -Q gpu --pool prefork --concurrency 1
#   light work:  celery -A worker.celery_app worker -Q default --pool prefork --concurrency 2
#   scheduler:   celery -A worker.celery_app beat
#
# The default build installs the CPU wheel of torch. For NVIDIA GPUs, point
# TORCH_INDEX_URL at a CUDA wheel index; those wheels bundle the CUDA runtime,
# so the slim base still works and the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit:
#
#   docker build -t subclone:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# PYTHON_IMAGE swaps the base, for example for an nvidia/cuda image with Python 3.11.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

# The highest torch version that pyproject.toml allows.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from its own index, so that installing the package below keeps
# this build instead of pulling the default wheel from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY subclone ./subclone
COPY app ./app
COPY worker ./worker
RUN pip install ".[service]"


FROM ${PYTHON_IMAGE}

RUN groupadd --system --gid 10001 subclone \
    && useradd --system --uid 10001 --gid subclone --create-home --home-dir /home/subclone subclone \
    && mkdir -p /var/lib/subclone \
    && chown subclone:subclone /var/lib/subclone

COPY --from=build /opt/venv /opt/venv

# HF_HOME keeps downloaded parents on the data volume rather than in the home directory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SUBCLONE_STATE_DIR=/var/lib/subclone \
    HF_HOME=/var/lib/subclone/huggingface

USER subclone
WORKDIR /home/subclone
VOLUME ["/var/lib/subclone"]
EXPOSE 8000

CMD ["python", "-m", "app", "serve", "--api-only", "--host", "0.0.0.0", "--port", "8000"]
