"""The operations the compiled modules run, one package per op: its reference, its fast forms and their dispatch."""
