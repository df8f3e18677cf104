# bidir-export: ONNX export and TensorRT engine builds (export-onnx, export-trt).
# Base: NVIDIA's TensorRT image, whose Python has the `tensorrt` bindings matching its libraries. torch (needed to
# trace the model) comes from PyPI; its wheels bundle their own CUDA runtime.
#
#   docker build -f containers/export.Dockerfile -t bidir-export .
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3

FROM ${BASE} AS wheels
WORKDIR /src
COPY packages/core packages/core
COPY packages/export packages/export
RUN python -m pip wheel --no-deps --wheel-dir /wheels ./packages/core ./packages/export

FROM ${BASE}
ARG TORCH=torch==2.13.0
COPY --from=wheels /wheels /wheels
RUN python -m pip install --no-cache-dir "${TORCH}" /wheels/bidir_core-*.whl /wheels/bidir_export-*.whl \
    && rm -rf /wheels \
    && python -c "import tensorrt, bidir_export; print('tensorrt', tensorrt.__version__)"
WORKDIR /workspace
ENTRYPOINT ["export-trt"]
CMD ["--help"]
