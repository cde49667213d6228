"""Persistent, versioned, validated, tenant-scoped LoRA adapters (see registry.py)."""
from .ids import AdapterSelector, parse_adapter_id
from .registry import AdapterInfo, AdapterVersionInfo, Registry
from .validate import RegistryLimits

__all__ = ["Registry", "AdapterInfo", "AdapterVersionInfo", "RegistryLimits", "AdapterSelector", "parse_adapter_id"]
