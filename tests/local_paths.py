"""What a card must not contain: a path that only means something on the machine that wrote it."""

import re

# a POSIX absolute path: "/" not inside a word, number or URI, then a path segment
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.<>])/[\w.-]+")
