public enum FuseFrontendPlaceholder {}
