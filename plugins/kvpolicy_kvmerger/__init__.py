"""kvpolicy plugin (work in progress)."""
