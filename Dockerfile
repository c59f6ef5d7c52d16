# The drctl image: worker, alert receiver, node agent, prober and CLI.
#   docker build -t ghcr.io/example/drctl:0.1.0 .
# The command is chosen by the deployment (the default is the Temporal worker).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs: no .venv, .drctl or tests in the image.
COPY pyproject.toml README.md ./
COPY drctl ./drctl
COPY examples ./examples
RUN pip install . \
    && groupadd --gid 10001 drctl \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/drctl drctl \
    && mkdir -p /var/lib/drctl \
    && chown 10001:10001 /var/lib/drctl

ENV DRCTL_POLICY=/app/examples/dr-policy.yaml \
    DRCTL_STATE_DIR=/var/lib/drctl

USER 10001:10001
EXPOSE 9095 9400
CMD ["python", "-m", "drctl.workers.runbook_worker"]
