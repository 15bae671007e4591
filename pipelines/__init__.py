"""The Flow-GRPO pipeline (pipelines.flowgrpo_pipeline) and the CLI commands that run, compile and submit it."""
