# METADATA
# title: Promotion of an agent out of its sandbox
# description: |
#   May this actor promote this agent spec to governed? Applies every rule in
#   agov.lib.spec_rules and every rule written here, plus the request-level
#   checks on the actor, the policy hash and the clock. allow is true only when
#   deny is empty. agov.revalidation asks this same decision for each governed
#   agent, with revalidating true: write rules about the agent here or in
#   spec_rules, and gate rules about who promotes, or when, with _promoting
#   (nobody is promoting then; ungated, they would invalidate).
# scope: package
# schemas:
#   - input: schema.promotion_input
#   - input.agent: schema.agent_spec
package agov.promotion

import data.agov.lib.spec_rules

# METADATA
# title: Promotion decision
# description: |
#   The engine queries POST /v1/data/agov/promotion/decision and gets
#   {"allow": bool, "deny": [{code, message}], "warn": [{code, message}]}.
#   deny and warn are sorted sets, so the answer is deterministic.
# entrypoint: true
# schemas:
#   - input: schema.promotion_input
#   - input.agent: schema.agent_spec
decision := {"allow": allow, "deny": deny, "warn": warn}

default allow := false

allow if count(deny) == 0

_finding(code, message) := {"code": code, "message": message}

_non_empty_string(value) if {
	is_string(value)
	trim_space(value) != ""
}

# Negate rules, never calls on input refs: `not f(input.x)` is undefined when
# input.x is missing (OPA rewrites it to `t := input.x; not f(t)`, OPA issue 1877).
_has_actor_id if _non_empty_string(input.actor.id)

_has_policy_hash if _non_empty_string(input.policy_hash)

_roles_configured if is_array(data.agov.config.promotion_roles)

default _actor_role := null

_actor_role := input.actor.role

_role_allowed if _actor_role in data.agov.config.promotion_roles

# A promotion request, not a revalidation of an agent promoted before: only a
# request is judged on who makes it.
_promoting if not revalidating

# METADATA
# title: Whether the decision is asked by agov.revalidation
# description: |
#   True only where agov.revalidation sets it (`with`), for each governed
#   agent: data, not input, so no caller of the promotion entrypoint can skip
#   the role checks by saying so.
default revalidating := false

_valid_now if is_number(time.parse_rfc3339_ns(input.now))

deny contains finding if some finding in spec_rules.deny

deny contains _finding(
	"PROMOTION_DENY_ROLE_NOT_ALLOWED",
	sprintf(
		"actor.role %s may not promote agents; allowed roles: %v",
		[json.marshal(_actor_role), data.agov.config.promotion_roles],
	),
) if {
	_promoting
	not _role_allowed
}

# Fallback so that ROLE_NOT_ALLOWED is never silenced by missing config data.
deny contains _finding(
	"PROMOTION_DENY_ROLE_NOT_ALLOWED",
	"data.agov.config.promotion_roles is missing or not an array: no role may promote",
) if {
	_promoting
	not _roles_configured
}

deny contains _finding("PROMOTION_DENY_INPUT_INVALID", "actor.id must be a non-empty string") if {
	not _has_actor_id
}

deny contains _finding("PROMOTION_DENY_INPUT_INVALID", "policy_hash must be a non-empty string") if {
	not _has_policy_hash
}

deny contains _finding("PROMOTION_DENY_INPUT_INVALID", "now must be an RFC 3339 timestamp") if {
	not _valid_now
}

warn contains finding if some finding in spec_rules.warn
