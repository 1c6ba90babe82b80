# The selector worker / dashboard image: CPU torch first (the pinned wheel), then selector.
FROM python:3.11-slim
WORKDIR /app
# torch before selector, pinned: add your CPU wheel index to TORCH_SPEC for a small CPU-only image
# (docker compose build --build-arg TORCH_SPEC="torch==2.13.0 --index-url URL").
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md constraints.txt ./
COPY selector ./selector
COPY studies ./studies
COPY data ./data
# every other package at the version the tests ran with
RUN pip install --no-cache-dir -c constraints.txt '.[postgres,grpc]'
ENV OMP_NUM_THREADS=1
ENTRYPOINT ["selector"]
CMD ["--help"]
