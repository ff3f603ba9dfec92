"""``python -m titans_compose``: the command line (e.g. ``torchrun --nproc_per_node N -m titans_compose train``)."""

from titans_compose.cli.main import main

if __name__ == "__main__":
    main()
