"""quick_lab.model: a Llama-architecture decoder over int4 weights, for end-to-end decode throughput
(paper Fig. 4). One job per module, lowest first (each imports only those above it in this list):

* ``config``     -- ModelConfig, the presets (Mistral-7B, Llama-2-13B/70B), BACKENDS, memory_estimate.
* ``weights``    -- host (NumPy) LayerWeights / ModelWeights and random int4 weights.
* ``reference``  -- the float32 NumPy reference forward and the RoPE tables (CPU ground truth).
* ``cublas``     -- ``matmul``: cuBLAS through ctypes, so a forward can be captured in a CUDA graph.
* ``fused``      -- the fused non-GEMM ops (kernels/decoder.cu): add + RMSNorm, RoPE + KV write,
                    attention over the cache, SiLU x up.
* ``decoder``    -- the GPU model: Linear (fp16 / awq / quick backends, each holding only its forms),
                    KVCache, Model (a layer as a list of named ops).
* ``checkpoint`` -- AutoAWQ checkpoint directories (config.json validated, safetensors shards,
                    tokenizer.json) -> ModelWeights.
* ``generate``   -- greedy decoding with the KV cache; text generation from a checkpoint, streamed.
* ``sweep``      -- CUDA-graph capture and timing, decode_throughput, e2e_sweep, summary_table.

Nothing is imported here: ``config``, ``weights``, ``reference`` and ``checkpoint`` are NumPy-only, the
rest import cupy only when called.
"""
