# Image of every host of the compose testbed (docker-compose.yml; README, "The compose testbed").
# A runtime image: Debian packages and the project's wheels, no test or benchmark extras.
# The wheels are built on the host (`python -m testbed.compose_cluster wheels` puts them in
# .compose/wheels/), so this build reaches no package index.  The layers go from what changes
# least to what changes most: packages, then dependencies, then the project.
ARG BASE_IMAGE=debian:12
FROM ${BASE_IMAGE}

COPY testbed/image/debian-packages.txt /tmp/debian-packages.txt
# Install only what the base lacks: the local base made by scripts/install-compose.sh has
# every package already (built without a registry or a mirror); debian:12 from a registry has not.
RUN set -eu; \
    missing=""; \
    for package in $(grep -v '^#' /tmp/debian-packages.txt); do \
      dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rm /tmp/debian-packages.txt

# `python3` on PATH is the venv's own: a venv is found from the path it is started by
# (pyvenv.cfg beside it), so linking its python elsewhere would lose the venv.
ENV PATH=/opt/distributor/bin:$PATH \
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY .compose/wheels/deps/ /tmp/wheels/
RUN python3 -m venv /opt/distributor && pip install -q --find-links /tmp/wheels /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY .compose/wheels/project/ /tmp/project/
RUN pip install -q --no-deps /tmp/project/*.whl && rm -rf /tmp/project

WORKDIR /run
CMD ["python3", "-m", "testbed.container", "client"]
