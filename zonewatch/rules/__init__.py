"""The rule engine: Falco-style YAML rules compiled once into closures, stateful detectors
(windows, first-seen, baselines), de-duplication, fixtures, replay. See engine.py."""

from zonewatch.rules.engine import RuleContext, RuleEngine, RulesError, RuleSet

__all__ = ["RuleContext", "RuleEngine", "RuleSet", "RulesError"]
