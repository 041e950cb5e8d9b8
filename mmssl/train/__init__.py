"""Training: recipes, tasks, the DeepSpeed engine and loop, checkpoints, export and plans.

Nothing here is imported by `import mmssl`; DeepSpeed is imported only when a run starts.
"""
