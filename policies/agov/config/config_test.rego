# METADATA
# title: The workspace's own limits, as data.json ships them
# description: |
#   The other tests replace data.agov.config with fixed limits, so that a
#   workspace may change its own without editing them. These check the limits
#   in config/data.json themselves. `opa test` runs before every reload, and a
#   failure refuses it: a typo there (a limit written as a string, a ratio left
#   out) would otherwise be activated and deny or invalidate whole fleets.
package agov.config_test

import data.agov.lib.spec_rules
import data.agov.promotion

_config := data.agov.config

_org := {"max_monthly_budget_usd": 1000}

# A spec within any limits (temperature 0) under role_class. Its own, not another test
# file's, so that editing those tests never makes these fail.
_agent(role_class) := {
	"apiVersion": "agov/v1",
	"kind": "Agent",
	"metadata": {"id": "config-check", "name": "Config check", "version": "1.0.0"},
	"spec": {
		"agent_type": "supervised",
		"role_class": role_class,
		"anatomy": {
			"reasoning": {"model": "some-model", "temperature": 0},
			"inputs": [{"name": "ledger", "classification": "internal"}],
			"actions": [{"type": "database.query", "resource": "postgresql"}],
			"memory": {"kind": "none"},
		},
		"capabilities": ["database.query"],
		"containment": {"external_calls": false, "persistent_writes": false},
		"economics": {"monthly_budget_usd": 100},
	},
}

# At least one role class: with none, every agent is denied (edit this test to allow that).
test_temperature_limits_map_role_classes_to_numbers if {
	is_object(_config.temperature_limits)
	count(_config.temperature_limits) > 0
	every role_class, limit in _config.temperature_limits {
		trim_space(role_class) != ""
		is_number(limit)
		limit >= 0
	}
}

# 0 warns about every budget; 1 or more about none.
test_budget_warn_ratio_is_a_number_of_zero_or_more if {
	is_number(_config.budget_warn_ratio)
	_config.budget_warn_ratio >= 0
}

test_promotion_roles_are_role_names if {
	is_array(_config.promotion_roles)
	every role in _config.promotion_roles {
		is_string(role)
		trim_space(role) != ""
	}
}

test_an_agent_within_the_limits_passes_under_each_role_class if {
	every role_class, _ in _config.temperature_limits {
		spec_rules.deny_for(_agent(role_class), _org) == set()
		is_set(spec_rules.warn_for(_agent(role_class), _org))
	}
}

# The findings and their messages are built from these limits too.
test_an_agent_beyond_the_limits_gets_findings if {
	findings := spec_rules.deny_for(_agent("no-such-role-class"), _org)
	{f.code | some f in findings} == {"PROMOTION_DENY_UNKNOWN_ROLE_CLASS", "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}
	every finding in findings {
		contains(finding.message, "no-such-role-class")
	}
}

test_a_budget_at_the_org_limit_is_warned_about_below_a_ratio_of_one if {
	at_limit := json.patch(_agent(_a_role_class), [{
		"op": "replace",
		"path": "/spec/economics/monthly_budget_usd",
		"value": _org.max_monthly_budget_usd,
	}])
	_warned_at_limit({f.code | some f in spec_rules.warn_for(at_limit, _org)})
}

# A ratio of 1 or more never warns.
_warned_at_limit(_) if _config.budget_warn_ratio >= 1

_warned_at_limit(codes) if "PROMOTION_WARN_BUDGET_NEAR_LIMIT" in codes

_a_role_class := sort(object.keys(_config.temperature_limits))[0]

test_each_promotion_role_may_promote if {
	every role in _config.promotion_roles {
		promotion.allow with input as {
			"agent": _agent(_a_role_class),
			"actor": {"id": "alice", "role": role},
			"org": _org,
			"policy_hash": "9f2c0e4ab1d37c55e0b8f6a2d4c1e3f5a7b9d0c2e4f6a8b0c1d3e5f7a9b2c4d6",
			"now": "2026-03-01T12:00:00Z",
		}
	}
}
