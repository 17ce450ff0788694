"""Fine-tuning as a service: a gRPC API that queues jobs in Redis, and workers that train them.

    python -m services.finetune           the API (services.finetune.handler behind servicer.py)
    python -m services.finetune.worker    a worker (run any number, on any machine that reaches
                                          Redis and the model store)

Modules: ``settings`` (flags / LMSTACK_* variables), ``store`` (the Redis schema and its atomic,
fenced transitions), ``spec`` (hyperparameter defaults and checks), ``bases`` (base models by
name), ``handler`` + ``servicer`` (the API), ``worker`` (claim, train, heartbeat, publish),
``client`` (a Python client the CLI, the tests and the benchmark use).
"""
