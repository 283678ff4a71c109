"""zae-limiter as a Pulumi program: a deployment from the stack's config.

See README.md for the config keys (`zae-limiter:name` is required).
"""

from zae_limiter.infra.component import stack_program

stack_program()
