"""The tests' way to run the `qwen-quantize` command in-process."""
from qwen_quant import cli


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of qwen-quantize; argparse's own errors exit through SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out
