package queue

import "testing"

// TestOnPostgres runs the queue's behaviour tests again on a PostgreSQL
// store: the queue does not know which backend it runs on, and must behave
// the same on both. Tests of the embedded store's own features (its
// directory, fsync failures, free space) and of configuration are left
// out.
func TestOnPostgres(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(*testing.T)
	}{
		{"DeliverAllAndRemove", TestDeliverAllAndRemove},
		{"EnvelopeOptionsPassedOnEveryAttempt", TestEnvelopeOptionsPassedOnEveryAttempt},
		{"PerRecipientOutcomes", TestPerRecipientOutcomes},
		{"RetryScheduleAndGiveUpAfterMaxTries", TestRetryScheduleAndGiveUpAfterMaxTries},
		{"GiveUpAfterMaxAge", TestGiveUpAfterMaxAge},
		{"DSNEnvelopeAndNullSender", TestDSNEnvelopeAndNullSender},
		{"NotifyRules", TestNotifyRules},
		{"DelayWarning", TestDelayWarning},
		{"RestartResumesWithoutResending", TestRestartResumesWithoutResending},
		{"AbortRemovesStoredMessage", TestAbortRemovesStoredMessage},
		{"DuplicateRecipientsDeliveredOnce", TestDuplicateRecipientsDeliveredOnce},
		{"ParallelismLimit", TestParallelismLimit},
		{"ShutdownWaitsForAttemptInFlight", TestShutdownWaitsForAttemptInFlight},
		{"ShutdownTimeoutCancelsAndKeepsMessage", TestShutdownTimeoutCancelsAndKeepsMessage},
		{"ShutdownCancelledAttemptIsNotATry", TestShutdownCancelledAttemptIsNotATry},
		{"CorruptEntryQuarantinedOthersDelivered", TestCorruptEntryQuarantinedOthersDelivered},
		{"UncommittedMessageRules", TestUncommittedMessageRules},
		{"StateSaveFailureNeitherLosesNorResends", TestStateSaveFailureNeitherLosesNorResends},
		{"UnsavedOutcomesBounded", TestUnsavedOutcomesBounded},
		{"AdminHoldRetryRelease", TestAdminHoldRetryRelease},
		{"AdminRetryMakesDueNow", TestAdminRetryMakesDueNow},
		{"AdminDeleteSendsNoReport", TestAdminDeleteSendsNoReport},
		{"AdminBounceReportsFailure", TestAdminBounceReportsFailure},
		{"AdminFilters", TestAdminFilters},
		{"AdminChangeDuringAttemptAppliedAfterIt", TestAdminChangeDuringAttemptAppliedAfterIt},
		{"AdminChangeToMessageBeingReceived", TestAdminChangeToMessageBeingReceived},
		{"NotifyCombinations", TestNotifyCombinations},
		{"MixedNotifyOneReportPerEvent", TestMixedNotifyOneReportPerEvent},
		{"DelayWarningTiming", TestDelayWarningTiming},
		{"GiveUpReportsLastTemporaryError", TestGiveUpReportsLastTemporaryError},
		{"DelayReportNotRepeatedAfterRestart", TestDelayReportNotRepeatedAfterRestart},
		{"ReturnedContent", TestReturnedContent},
		{"HundredRecipientsOneReport", TestHundredRecipientsOneReport},
		{"StressEnqueueDeliverAdmin", TestStressEnqueueDeliverAdmin},
		{"SlowDestinationHoldsOnlyItsOwnSlots", TestSlowDestinationHoldsOnlyItsOwnSlots},
		{"MessageStoredPerDestination", TestMessageStoredPerDestination},
		{"DeadDestinationSuspendedProbedAndReleased", TestDeadDestinationSuspendedProbedAndReleased},
		{"RetryLiftsSuspension", TestRetryLiftsSuspension},
		{"SuspensionKeepsDeadlineAndDelayReports", TestSuspensionKeepsDeadlineAndDelayReports},
		{"FallbackTarget", TestFallbackTarget},
	} {
		t.Run(tc.name, func(t *testing.T) {
			onPostgres = true
			defer func() { onPostgres = false }()
			tc.fn(t)
		})
	}
}
