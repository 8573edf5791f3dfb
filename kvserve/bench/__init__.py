"""`kvserve bench`: reproducible benchmark workloads, peers side by side, JSON lines and reports.

Modules: `workloads` (seeded request sets), `machine` (hardware, versions, commit), `offline`
(kvserve throughput / latency with per-step engine stats), `peers` (HF transformers,
llama.cpp), `serve` (streaming clients against an OpenAI-compatible URL), `prefix` (shared
system prompt with and without prefix caching), `kv_ablation`, `report` (Markdown + PNG).
"""
