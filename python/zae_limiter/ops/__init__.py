"""Operations: provisioning (`provisioning`), the stack manager (`stacks`), recovery commands
(`recovery`: inspection, backups, exports, restores), data migrations (`migrations`), limits as
a YAML file (`limits_file`), the embedded DynamoDB (`local`) and the demo (`demo`).

The names of `recovery` are importable from here, as they were from the module `zae_limiter.ops`.
"""

from .recovery import (
    DEFAULT_BACKUP_DIR,
    EXPORT_FORMAT,
    LimitRow,
    backup,
    bucket_items,
    create_backup,
    export_path,
    export_table,
    import_table,
    iso_ms,
    limit_rows,
    list_backups,
    list_exports,
    read_export,
    reset_buckets,
    restore_hints,
    version_status,
    version_status_async,
)

__all__ = [
    "DEFAULT_BACKUP_DIR",
    "EXPORT_FORMAT",
    "LimitRow",
    "backup",
    "bucket_items",
    "create_backup",
    "export_path",
    "export_table",
    "import_table",
    "iso_ms",
    "limit_rows",
    "list_backups",
    "list_exports",
    "read_export",
    "reset_buckets",
    "restore_hints",
    "version_status",
    "version_status_async",
]
