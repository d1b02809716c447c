//! Tests of the referral model.
