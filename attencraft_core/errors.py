"""The one exception type the core raises for problems a user can fix."""


class AttenCraftError(ValueError):
    """Bad input or an unusable result, with a message that names the problem and the fix.

    The command line prints it without a traceback; the ComfyUI nodes show it as a node error.
    """
