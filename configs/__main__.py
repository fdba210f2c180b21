"""python -m dyngen.configs [NAME]: the file of experiment config NAME (for --config=), or every name and file."""
import sys

from dyngen import configs


def main(argv):
  if len(argv) > 2:
    sys.exit(f"usage: python -m dyngen.configs [NAME]; got {argv[1:]}")
  if len(argv) == 2:
    try:
      print(configs.path(argv[1]))
    except ValueError as error:
      sys.exit(f"error: {error}")
    return
  for name in configs.names():
    print(f"{name:20s} {configs.path(name)}")


if __name__ == "__main__":
  main(sys.argv)
