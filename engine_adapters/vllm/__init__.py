"""The vLLM engine adapter: vLLM executes the planner's steps through its pluggable scheduler.

`version` (supported releases) and `interface_check` (the recorded scheduler interface) import
without vLLM; `scheduler` needs vLLM; `engine` imports vLLM only when a `VLLMEngine` is built.
See docs/VLLM_ADAPTER.md.
"""
