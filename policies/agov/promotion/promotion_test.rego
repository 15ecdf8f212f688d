package agov.promotion_test

import data.agov.lib.spec_rules_test
import data.agov.promotion

# the limits the tests are written against (see agov.lib.spec_rules_test.config)
config := spec_rules_test.config

valid_input := {
	"agent": spec_rules_test.agent,
	"actor": {"id": "alice", "role": "agent_admin"},
	"org": {"max_monthly_budget_usd": 1000},
	"policy_hash": "9f2c0e4ab1d37c55e0b8f6a2d4c1e3f5a7b9d0c2e4f6a8b0c1d3e5f7a9b2c4d6",
	"now": "2026-03-01T12:00:00Z",
}

put(path, value) := json.patch(valid_input, [{"op": "add", "path": path, "value": value}])

codes(findings) := {f.code | some f in findings}

# print_on_failure is got == want, and prints the failing case (opa test -v).
print_on_failure(name, got, want) if {
	got == want
} else := false if {
	print(name, "got", got, "want", want)
}

test_valid_input_is_allowed if {
	promotion.decision == {"allow": true, "deny": set(), "warn": set()} with input as valid_input
		with data.agov.config as config
}

test_policy_admin_may_promote if {
	promotion.allow with input as put("/actor/role", "policy_admin") with data.agov.config as config
}

# Each case: the input and the exact set of deny codes it must give.
cases := {
	"role not allowed": {"input": put("/actor/role", "viewer"), "deny": {"PROMOTION_DENY_ROLE_NOT_ALLOWED"}},
	"role differs only in case": {"input": put("/actor/role", "Agent_Admin"), "deny": {"PROMOTION_DENY_ROLE_NOT_ALLOWED"}},
	"role a list": {"input": put("/actor/role", ["agent_admin"]), "deny": {"PROMOTION_DENY_ROLE_NOT_ALLOWED"}},
	"actor id empty": {"input": put("/actor/id", ""), "deny": {"PROMOTION_DENY_INPUT_INVALID"}},
	"actor id blank": {"input": put("/actor/id", "  "), "deny": {"PROMOTION_DENY_INPUT_INVALID"}},
	"actor not an object": {
		"input": put("/actor", "alice"),
		"deny": {"PROMOTION_DENY_INPUT_INVALID", "PROMOTION_DENY_ROLE_NOT_ALLOWED"},
	},
	"policy hash a number": {"input": put("/policy_hash", 42), "deny": {"PROMOTION_DENY_INPUT_INVALID"}},
	"now not RFC 3339": {"input": put("/now", "2026-03-01 12:00"), "deny": {"PROMOTION_DENY_INPUT_INVALID"}},
	"spec rule": {
		"input": put("/agent/spec/anatomy/reasoning/temperature", 0.9),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"},
	},
	"budget over the org limit": {
		"input": put("/org/max_monthly_budget_usd", 100),
		"deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"},
	},
	"input not an object": {
		"input": "promote me",
		"deny": {
			"PROMOTION_DENY_INVALID_AGENT_ID",
			"PROMOTION_DENY_ANATOMY_INCOMPLETE",
			"PROMOTION_DENY_CONTAINMENT_BREACHED",
			"PROMOTION_DENY_NO_CAPABILITIES",
			"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
			"PROMOTION_DENY_UNKNOWN_ROLE_CLASS",
			"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
			"PROMOTION_DENY_INPUT_INVALID",
			"PROMOTION_DENY_ROLE_NOT_ALLOWED",
		},
	},
}

test_cases if {
	every name, case in cases {
		decision := promotion.decision with input as case.input with data.agov.config as config
		print_on_failure(name, codes(decision.deny), case.deny)
		decision.allow == false
	}
}

test_warnings_do_not_deny if {
	decision := promotion.decision with input as put("/agent/spec/agent_type", "autonomous")
		with data.agov.config as config
	decision.allow == true
	codes(decision.warn) == {"PROMOTION_WARN_AUTONOMOUS_AGENT"}
}

test_role_message if {
	{
		"code": "PROMOTION_DENY_ROLE_NOT_ALLOWED",
		"message": `actor.role "viewer" may not promote agents; allowed roles: ["agent_admin", "policy_admin"]`,
	} in promotion.deny with input as put("/actor/role", "viewer") with data.agov.config as config
}

test_roles_come_from_data if {
	promotion.allow with input as put("/actor/role", "auditor")
		with data.agov.config as config
		with data.agov.config.promotion_roles as ["auditor"]
}

test_missing_roles_config_denies if {
	denies := promotion.deny with input as valid_input with data.agov.config as config
		with data.agov.config.promotion_roles as null
	{
		"code": "PROMOTION_DENY_ROLE_NOT_ALLOWED",
		"message": "data.agov.config.promotion_roles is missing or not an array: no role may promote",
	} in denies
	not promotion.allow with input as valid_input with data.agov.config as config
		with data.agov.config.promotion_roles as null
}

# R14: each required input field dropped in turn must deny, with the code that
# names it. Keys are JSON pointers into valid_input.
required_fields := {
	"/agent": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/apiVersion": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/kind": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/metadata": "PROMOTION_DENY_INVALID_AGENT_ID",
	"/agent/metadata/id": "PROMOTION_DENY_INVALID_AGENT_ID",
	"/agent/metadata/name": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/metadata/version": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/spec": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/agent_type": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/spec/role_class": "PROMOTION_DENY_UNKNOWN_ROLE_CLASS",
	"/agent/spec/anatomy": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/anatomy/reasoning": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/anatomy/reasoning/model": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/spec/anatomy/reasoning/temperature": "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
	"/agent/spec/anatomy/inputs": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/anatomy/actions": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/anatomy/memory": "PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"/agent/spec/anatomy/memory/kind": "PROMOTION_DENY_INPUT_INVALID",
	"/agent/spec/capabilities": "PROMOTION_DENY_NO_CAPABILITIES",
	"/agent/spec/containment": "PROMOTION_DENY_CONTAINMENT_BREACHED",
	"/agent/spec/containment/external_calls": "PROMOTION_DENY_CONTAINMENT_BREACHED",
	"/agent/spec/containment/persistent_writes": "PROMOTION_DENY_CONTAINMENT_BREACHED",
	"/agent/spec/economics": "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	"/agent/spec/economics/monthly_budget_usd": "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	"/actor": "PROMOTION_DENY_ROLE_NOT_ALLOWED",
	"/actor/id": "PROMOTION_DENY_INPUT_INVALID",
	"/actor/role": "PROMOTION_DENY_ROLE_NOT_ALLOWED",
	"/org": "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	"/org/max_monthly_budget_usd": "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	"/policy_hash": "PROMOTION_DENY_INPUT_INVALID",
	"/now": "PROMOTION_DENY_INPUT_INVALID",
}

test_r14_each_required_field_dropped_denies if {
	every path, code in required_fields {
		decision := promotion.decision with input as json.remove(valid_input, [path])
			with data.agov.config as config
		print_on_failure(path, [decision.allow, code in codes(decision.deny)], [false, true])
	}
}

test_a_revalidation_is_not_judged_on_its_actor if {
	request := object.union(valid_input, {"actor": {"id": "agov-revalidation", "role": "system"}})
	promotion.decision == {"allow": true, "deny": set(), "warn": set()} with input as request
		with data.agov.config as config
		with promotion.revalidating as true

	# the same actor on a promotion request is refused
	codes(promotion.deny) == {"PROMOTION_DENY_ROLE_NOT_ALLOWED"} with input as request
		with data.agov.config as config
}

# A caller of the promotion entrypoint cannot say it revalidates: only data
# (set by agov.revalidation) skips the role checks.
test_input_cannot_skip_the_role_checks if {
	request := object.union(put("/actor/role", "viewer"), {"purpose": "revalidation", "revalidating": true})
	codes(promotion.deny) == {"PROMOTION_DENY_ROLE_NOT_ALLOWED"} with input as request
		with data.agov.config as config
}
