"""The serving wing: one room for each idea (docs/serving.md draws it).

- ``requests``: request and answer types (token ids in, tokens or a head's row out).
- ``task_table``: the one owner of every fact about a served task, and which row each holds.
- ``scheduler``: host only, no JAX: queues, admission, fairness, deadlines and decode slots.
- ``engine``: device work only: the jitted prefill, insert and decode steps, the weights.
- ``task_loader``: tasks of other runs written into spare rows while serving.
- ``server``: a restored model with its table, scheduler and engine; request parsing and answers.
- ``chat``, ``openai_api``: chat templates; OpenAI's request mapping and answer shapes.
- ``http_app`` and the route families ``routes_mtl``, ``routes_openai``, ``routes_admin``, ``metrics``
  (with ``http_base``, what they share).

This file imports nothing, so that ``mtl.serving.scheduler`` loads without JAX.
"""
