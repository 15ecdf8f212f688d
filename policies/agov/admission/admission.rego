# METADATA
# title: Admission of an agent at start
# description: |
#   The engine computes the facts; this policy decides and names the code.
#   A fact holds only if it is exactly true: missing, null, "true" or 1 fail.
#   Precedence, first failing check is the code:
#   (1) status missing or unknown: ADMISSION_DENY_INPUT_INVALID;
#       status GOVERNED_INVALIDATED: ADMISSION_DENY_INVALIDATED.
#   (2) agent_id empty, now not RFC 3339: ADMISSION_DENY_INPUT_INVALID.
#   (3) GOVERNED_VALID, GOVERNED_RESTRICTED: the proof chain (_proof_chain).
#       SANDBOX: the sandbox chain (_sandbox_chain).
# scope: package
# schemas:
#   - input: schema.admission_input
package agov.admission

# Precedence. reasons lists the failing checks in this order (a fact the
# engine could not establish only when it fails first, see _listed); code is
# the first one, or ADMISSION_ALLOW when nothing fails.
#
#   (1) status          missing / unknown     -> ADMISSION_DENY_INPUT_INVALID
#                       GOVERNED_INVALIDATED  -> ADMISSION_DENY_INVALIDATED
#   (2) agent_id        missing / empty       -> ADMISSION_DENY_INPUT_INVALID
#       now             not RFC 3339          -> ADMISSION_DENY_INPUT_INVALID
#   (3) GOVERNED_VALID and GOVERNED_RESTRICTED (sandbox facts are ignored):
#       proof_present        -> ADMISSION_DENY_PROOF_MISSING
#       signature_valid      -> ADMISSION_DENY_SIGNATURE_INVALID
#       signer_not_revoked   -> ADMISSION_DENY_SIGNER_REVOKED
#       proof_not_expired    -> ADMISSION_DENY_PROOF_EXPIRED
#       spec_hash_match      -> ADMISSION_DENY_SPEC_HASH_MISMATCH
#       policy_hash_match    -> ADMISSION_DENY_POLICY_HASH_MISMATCH
#   (3) SANDBOX (proof facts are ignored):
#       sandbox_not_expired  -> ADMISSION_DENY_SANDBOX_EXPIRED
#       containment_valid    -> ADMISSION_DENY_CONTAINMENT_VIOLATION
#
# The chains are data: to change the order, reorder the arrays below.
_proof_chain := [
	{"fact": "proof_present", "code": "ADMISSION_DENY_PROOF_MISSING", "message": "no promotion proof is present"},
	{"fact": "signature_valid", "code": "ADMISSION_DENY_SIGNATURE_INVALID", "message": "the proof signature is invalid"},
	{
		"fact": "signer_not_revoked",
		"code": "ADMISSION_DENY_SIGNER_REVOKED",
		"message": "the proof signer is revoked; once a key may sign, `agov revalidate` re-signs it",
	},
	{
		"fact": "proof_not_expired",
		"code": "ADMISSION_DENY_PROOF_EXPIRED",
		"message": "the proof has expired; promote the agent again for a new proof",
	},
	{
		"fact": "spec_hash_match", "code": "ADMISSION_DENY_SPEC_HASH_MISMATCH",
		"message": "the spec hash differs from the one the proof signs",
	},
	{
		"fact": "policy_hash_match", "code": "ADMISSION_DENY_POLICY_HASH_MISMATCH",
		"message": "the policy hash differs from the one the proof signs",
	},
]

_sandbox_chain := [
	{"fact": "sandbox_not_expired", "code": "ADMISSION_DENY_SANDBOX_EXPIRED", "message": "the sandbox period has expired"},
	{
		"fact": "containment_valid", "code": "ADMISSION_DENY_CONTAINMENT_VIOLATION",
		"message": "the sandbox containment is not in force",
	},
]

_chains := {
	"GOVERNED_VALID": _proof_chain,
	"GOVERNED_RESTRICTED": _proof_chain,
	"SANDBOX": _sandbox_chain,
}

_input_checks := [
	{"field": "agent_id", "message": "agent_id must be a non-empty string"},
	{"field": "now", "message": "now must be an RFC 3339 timestamp"},
]

# METADATA
# title: Admission decision
# description: |
#   The engine queries POST /v1/data/agov/admission/decision and gets
#   {"allow": bool, "code": string, "reasons": [{code, message}]}, where code
#   is ADMISSION_ALLOW or the first failing check in the precedence order of
#   the package description, and reasons lists the failing checks in order
#   (a fact that is not exactly false only when it is the first to fail).
#   An admitted start is answered from allow alone: the reasons are built
#   only for a deny, since nearly every start is admitted.
# entrypoint: true
# schemas:
#   - input: schema.admission_input
decision := {"allow": true, "code": "ADMISSION_ALLOW", "reasons": []} if {
	allow
} else := {"allow": false, "code": code, "reasons": reasons}

default allow := false

# METADATA
# title: The one definition of an admitted start
# scope: document
# description: |
#   The status has a non-empty chain, the request fields are valid and every
#   fact of the chain is exactly true. decision trusts allow without building
#   the reasons, so a new kind of check must both fail allow and add a
#   reason; admission_test checks, at every reload, that allow holds exactly
#   when reasons is empty.
allow if {
	chain := _chains[input.status]
	count(chain) > 0
	_agent_id_valid(input.agent_id)
	_now_valid(input.now)

	# _holds inlined: a function call per fact doubles the cost of this rule
	every check in chain {
		input.facts[check.fact] == true
	}
}

default code := "ADMISSION_DENY_INPUT_INVALID"

code := "ADMISSION_ALLOW" if {
	allow
} else := reasons[0].code

reasons := array.flatten([_status_reasons, _input_reasons, _fact_reasons])

default _status := null

_status := input.status

default _chain := []

_chain := _chains[_status]

_statuses := array.concat(sort(object.keys(_chains)), ["GOVERNED_INVALIDATED"])

_reason(code, message) := {"code": code, "message": message}

# (1) status
_status_reasons := [_reason(
	"ADMISSION_DENY_INVALIDATED",
	"the agent is GOVERNED_INVALIDATED: fix it and promote it again",
)] if {
	_status == "GOVERNED_INVALIDATED"
} else := [] if {
	_status in object.keys(_chains)
} else := [_reason(
	"ADMISSION_DENY_INPUT_INVALID",
	sprintf("status %s is not one of %v", [json.marshal(_status), _statuses]),
)]

# (2) request fields
_input_valid contains "agent_id" if _agent_id_valid(input.agent_id)

_input_valid contains "now" if _now_valid(input.now)

_agent_id_valid(agent_id) if {
	is_string(agent_id)
	trim_space(agent_id) != ""
}

_now_valid(now) if is_number(time.parse_rfc3339_ns(now))

_input_reasons := [_reason("ADMISSION_DENY_INPUT_INVALID", check.message) |
	some check in _input_checks
	not check.field in _input_valid
]

# (3) facts of the status's chain, in chain order. The engine establishes the
# proof facts in chain order and sends null for those it never got to (once
# the signature fails, the proof's expiry and hashes are unknown). So a check
# is listed when its fact is false, or when it is the first that fails: a
# missing proof is not also called an invalid signature, an expired proof and
# two hash mismatches. allow still needs every fact exactly true.
_holds(fact) if input.facts[fact] == true

_failing := [i | some i, check in _chain; not _holds(check.fact)]

_listed(_, fact) if input.facts[fact] == false

_listed(i, _) if i == _failing[0]

_shown_fact(fact) := json.marshal(value) if {
	value := input.facts[fact]
} else := "missing"

# The filter comes first: OPA evaluates a body in order, so a message is only
# formatted for a check that failed (admission runs at every start).
_fact_reasons := [_reason(check.code, message) |
	some i, check in _chain
	not _holds(check.fact)
	_listed(i, check.fact)
	message := sprintf("%s (facts.%s is %s, want true)", [check.message, check.fact, _shown_fact(check.fact)])
]
