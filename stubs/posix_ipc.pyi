# Hand-written stub for posix_ipc (http://semanchuk.com/philip/posix_ipc/), which ships
# no type information. It covers exactly the part of posix_ipc that hybrid_layer and its
# tests use: shared-memory segments opened or created by name, their unlinking, the
# flags and the errors. Checked against posix_ipc 1.3.2. Using more of posix_ipc
# (semaphores, message queues, other attributes) means adding it here first. For mypy
# only (`mypy_path = "stubs"` in pyproject.toml): it is not shipped in the wheel.

O_CREAT: int
O_CREX: int

class Error(Exception): ...
class ExistentialError(Error): ...
class PermissionsError(Error): ...

class SharedMemory:
    @property
    def fd(self) -> int: ...
    def __init__(
        self,
        name: str | None,
        flags: int = 0,
        mode: int = 0o600,
        size: int = 0,
        read_only: bool = False,
    ) -> None: ...
    def close_fd(self) -> None: ...

def unlink_shared_memory(name: str) -> None: ...
