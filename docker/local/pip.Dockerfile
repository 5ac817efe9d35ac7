# The offline build stage: the local Python image plus a folder of wheels (this build's context, made by
# `./skin images --offline` with pip download on the host), and pip told to use only that folder. The
# Dockerfiles install from it in a build stage and copy the resulting /opt/venv into their runtime stage, so
# the wheels never end up in a runtime image.
ARG SKIN_PYTHON_IMAGE=skin-local/python:3.11-bookworm
FROM ${SKIN_PYTHON_IMAGE}
COPY . /wheels/
ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
