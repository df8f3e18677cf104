# bidir-serve: batch-embed with the torch, onnxruntime and TensorRT backends.
# Base: NVIDIA's TensorRT image (the `tensorrt` runtime for engines from bidir-export). torch comes from PyPI.
# onnxruntime and onnxruntime-gpu install into the same folder, so the CPU build pulled in by bidir-serve's
# metadata is swapped for the GPU build in one step (never both installed at once).
#
#   docker build -f containers/serve.Dockerfile -t bidir-serve .
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3

FROM ${BASE} AS wheels
WORKDIR /src
COPY packages/core packages/core
COPY packages/serve packages/serve
RUN python -m pip wheel --no-deps --wheel-dir /wheels ./packages/core ./packages/serve

FROM ${BASE}
ARG TORCH=torch==2.13.0
ARG ORT_GPU=onnxruntime-gpu==1.31.1
COPY --from=wheels /wheels /wheels
RUN python -m pip install --no-cache-dir "${TORCH}" /wheels/bidir_core-*.whl /wheels/bidir_serve-*.whl \
    && python -m pip uninstall -y onnxruntime \
    && python -m pip install --no-cache-dir --force-reinstall --no-deps "${ORT_GPU}" \
    && rm -rf /wheels \
    && python -c "import tensorrt, onnxruntime, bidir_serve; print(onnxruntime.get_available_providers())"
WORKDIR /workspace
ENTRYPOINT ["batch-embed"]
CMD ["--help"]
