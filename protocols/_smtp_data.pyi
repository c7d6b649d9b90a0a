from typing import Final

from typing_extensions import Buffer

NONE: Final[int]
END_OF_DATA: Final[int]
BARE: Final[int]
TRAILING_CR: Final[int]

def first_stop(chunk: Buffer, reject: bool, /) -> tuple[int, int]: ...
