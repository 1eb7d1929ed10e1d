# wsi-mil with a CUDA-capable torch (PyPI's Linux torch wheels bundle the CUDA runtime).
#   docker build -t wsi-mil .
#   docker run --rm --gpus all -v $PWD/data:/data wsi-mil run /data/slides --labels /data/labels.csv --out /data/out
# OpenSlide comes from the openslide-bin wheel, so no system packages are needed.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

WORKDIR /opt/wsi-mil
COPY pyproject.toml README.md ./
COPY wsi_mil ./wsi_mil
COPY workflows ./workflows
COPY configs ./configs
RUN pip install . && wsi-mil --version

WORKDIR /data
EXPOSE 5000
ENTRYPOINT ["wsi-mil"]
CMD ["--help"]
