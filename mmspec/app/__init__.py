"""The application layer: the ``mmspec`` command line, batch jobs, benchmarks, evaluation and the
Gradio demos. It sits above the pipelines and the training recipes; nothing below imports it."""
