"""lm-eval's command line with the ``titans_compose`` model type registered.

lm-eval finds model types only in its own registry and offers other packages no hook to add one (no entry-point
group), so its ``lm_eval`` command cannot know this one. This module registers it, then runs lm-eval's own command
line with the same arguments (the ``titans-compose-lm-eval`` script does the same)::

    python -m titans_compose.hf.lm_eval_cli --model titans_compose --model_args pretrained=DIR --tasks TASK
"""

from __future__ import annotations


def main() -> None:
    """``lm_eval ARGS`` with the ``titans_compose`` model type."""
    try:
        import titans_compose.hf.harness  # noqa: F401  (registers the model type)
    except ImportError as exc:
        raise SystemExit(f"titans-compose-lm-eval: {exc}") from None
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
