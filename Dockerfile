# syntax=docker/dockerfile:1.7
# One image for every Falaj component: the six services, the gateway and the `falaj` CLI
# (PKI job, health checks). docker-compose.yml and deploy/k8s/ pick the component by
# command, e.g. `python -m falaj_platform.services.ingest` or `falaj health ingest`.
#
#   docker build -t falaj/platform:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t falaj/platform:0.1.0-cuda .        # the GPU image for deploy/k8s/overlays/gpu

# Exact patch tag, so a rebuild gets the same interpreter; pin the digest too
# (python:3.11.14-slim-bookworm@sha256:...) when the image is built for a release.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# -- stage 1: every wheel the platform needs, built or downloaded once -----------------
FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# requirements.lock pins torch==2.13.0, which dev machines install from a local CPU wheel.
# Here that one package comes from PyTorch's own index: its 2.13.0+cpu build satisfies
# the pin (a local version label matches ==2.13.0) without the several GB of CUDA wheels
# PyPI's Linux build pulls in. Every other pin comes from PyPI as usual.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /build
RUN python -m pip install pip==25.3
COPY requirements.lock ./
RUN grep -v '^torch==' requirements.lock > requirements-without-torch.txt \
    && pip wheel --wheel-dir /wheels --no-deps -r requirements-without-torch.txt \
    && pip wheel --wheel-dir /wheels --constraint requirements.lock \
        --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
# The two local packages: the SDK (stubs + client) and the platform (services, CLI).
COPY sdk/pyproject.toml sdk/pyproject.toml
COPY sdk/src sdk/src
COPY pyproject.toml ./
COPY src src
RUN pip wheel --wheel-dir /wheels --no-deps ./sdk .

# -- stage 2: the runtime image, no compilers, no pip cache, not root ------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/falaj/venv \
    PATH=/opt/falaj/venv/bin:$PATH \
    FALAJ_HOME=/var/lib/falaj \
    FALAJ_PKI_DIR=/etc/falaj/pki
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it and PKI files written by
# the PKI job (mode 0600) are readable by every component.
RUN groupadd --system --gid 10001 falaj \
    && useradd --system --uid 10001 --gid falaj --home-dir /var/lib/falaj --no-create-home \
        --shell /usr/sbin/nologin falaj \
    && mkdir -p /var/lib/falaj /etc/falaj/pki \
    && chown falaj:falaj /var/lib/falaj /etc/falaj/pki
# Installed from stage 1's wheels only (--no-index): the image holds exactly the lock.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    python -m venv "${VIRTUAL_ENV}" \
    && pip install --no-index --find-links /wheels -r /tmp/requirements.lock \
    && pip install --no-index --no-deps /wheels/falaj_sdk-*.whl /wheels/falaj_platform-*.whl \
    && pip check
USER 10001:10001
WORKDIR /var/lib/falaj
# A new, empty named volume mounted on /var/lib/falaj or /etc/falaj/pki starts out owned
# by the falaj user: Docker copies the image's ownership of the mount point into it.
# gateway 8443; services 50061-50066; Prometheus /metrics 9461-9467.
EXPOSE 8443 50061 50062 50063 50064 50065 50066 9461 9462 9463 9464 9465 9466 9467
CMD ["falaj", "--help"]
