# The selector worker / dashboard image: CPU torch first (the pinned wheel), then selector.
FROM python:3.11-slim
WORKDIR /app
# torch before selector, pinned: add your CPU wheel index to TORCH_SPEC for a small CPU-only image
# (docker compose build --build-arg TORCH_SPEC="torch==2.13.0 --index-url URL").
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY selector ./selector
COPY studies ./studies
COPY data ./data
RUN pip install --no-cache-dir '.[postgres,grpc]'
ENV OMP_NUM_THREADS=1
ENTRYPOINT ["selector"]
CMD ["--help"]
